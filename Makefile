# The README's commands. Each sets the environment up first (idempotent, seconds when nothing changed).
# scripts/setup_env.sh builds $MAE_DET_VENV when it is set (README, "Installation details"): every target uses it too
# (quoted: the folder's path may hold a space).
PY := "$(or $(MAE_DET_VENV),.venv)/bin/python"
PROFILE ?= full

.PHONY: setup test test-fast demo demo-quick experiment experiment-pyramid experiment-pretrain-seeds parity clean-demo

setup:
	bash scripts/setup_env.sh

# One pytest-xdist worker per core (at most 4), one torch thread each (tests/conftest.py): on 2 cores the suite
# takes about half its serial time (README, Project layout), most of it in end-to-end runs of the tools that use one
# core each.
TEST_WORKERS := -n auto --maxprocesses 4

test: setup
	$(PY) -m pytest tests $(TEST_WORKERS)

test-fast: setup
	$(PY) -m pytest tests $(TEST_WORKERS) -m "not slow"

demo: setup
	$(PY) tools/demo.py --profile $(PROFILE)

demo-quick: setup
	$(PY) tools/demo.py --profile quick

EXPERIMENT := $(PY) tools/demo.py --profile experiment --seeds 3 --label-fractions 0.25,0.5,1 --semantic \
	--output output/experiment
experiment: setup
	$(EXPERIMENT)
	mkdir -p docs/results && cp output/experiment/demo_experiment.csv output/experiment/demo_encoders.csv \
		output/experiment/demo_semantic.csv docs/results/

# make experiment plus every init fine-tuned with ViTDet's simple pyramid too, at every label fraction (27 runs, ~70
# minutes more on 2 cores; resumes a finished make experiment): the report's "Pyramid check" gives MAE's margin with
# each init at its best pyramid, per label fraction.
experiment-pyramid: experiment
	$(EXPERIMENT) --reference-pyramid simple
	cp output/experiment/demo_pyramid.csv docs/results/

# make experiment plus a second pretraining seed of both arms (SEED 1), each new encoder fine-tuned on all labels
# with the 3 seeds (2 pretrainings + 6 runs, ~25 minutes more on the faster machines; resumes a finished make
# experiment): the report's "Pretraining seeds" section gives the spread over encoders, not only fine-tuning seeds.
experiment-pretrain-seeds: experiment
	$(EXPERIMENT) --pretrain-seeds 2
	cp output/experiment/demo_pretrain_seeds.csv docs/results/

# Ours vs Detectron2's own ViTDet, trained side by side (3 seeds each) on the shapes data (generated into
# output/parity/shapes when missing, with make experiment's 160 labeled images: the parity table's settings).
# PARITY_CONFIG / PARITY_OPTS choose another config or dataset (e.g. PARITY_OPTS="DATASETS.REGISTER [[...]]").
PARITY_CONFIG ?= configs/shapes/mask_rcnn_vit_parity.yaml
PARITY_DATA := output/parity/shapes
PARITY_OPTS ?= DATASETS.REGISTER "[['shapes_train','$(PARITY_DATA)/annotations/instances_train.json','$(PARITY_DATA)/images/train'],['shapes_val','$(PARITY_DATA)/annotations/instances_val.json','$(PARITY_DATA)/images/val']]"

parity: setup
	test -f $(PARITY_DATA)/dataset_info.json || $(PY) tools/generate_shapes.py --root $(PARITY_DATA) --image-size 64 \
		--num-pool 8 --num-train 160 --num-val 300 --num-cls-train 6 --num-cls-val 6 --max-objects 4 --min-size 0.12 --max-size 0.3
	OMP_NUM_THREADS=1 $(PY) tools/benchmark_det.py --side-by-side --config-file $(PARITY_CONFIG) --seeds 3 --jobs 2 \
		--output output/parity/runs $(PARITY_OPTS)

clean-demo:
	rm -rf output/demo output/demo_quick datasets/shapes/full datasets/shapes/quick
