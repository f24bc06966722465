import logging
import warnings

from mae_det.utils.known_warnings import KNOWN_LOGGERS, KNOWN_WARNINGS, filter_known_warnings


def test_known_warnings_are_silenced_and_others_still_shown():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filter_known_warnings()
        warnings.warn("`torch.jit.script` is deprecated. Please switch to `torch.compile`", FutureWarning)
        warnings.warn("torch.meshgrid: in an upcoming release, it will be required to pass the indexing argument.",
                      UserWarning)
        warnings.warn("pkg_resources is deprecated as an API. See https://setuptools.pypa.io/en/latest/", UserWarning)
        warnings.warn("Importing from timm.models.layers is deprecated, please import via timm.layers", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
        # The same text under another category is not one of the known, harmless cases.
        warnings.warn("`torch.jit.script` is deprecated", DeprecationWarning)
    assert [(w.category, str(w.message)) for w in caught] == [
        (FutureWarning, "something else is deprecated"), (DeprecationWarning, "`torch.jit.script` is deprecated")]


def test_known_loggers_keep_errors_only():
    filter_known_warnings()
    for name, why in KNOWN_LOGGERS:
        assert why and logging.getLogger(name).getEffectiveLevel() == logging.ERROR
    assert all(why for *_, why in KNOWN_WARNINGS)


def test_the_read_only_array_warning_is_silenced_only_where_detectron2_raises_it():
    message = "The given NumPy array is not writable, and PyTorch does not support non-writable tensors."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filter_known_warnings()
        for module in ("detectron2.data.detection_utils", "mae_det.data.detection", "my_script"):
            warnings.warn_explicit(message, UserWarning, f"{module.replace('.', '/')}.py", 1, module=module)
    # mae_det's own call sites copy instead (a warning from them is a bug to see, not noise)
    assert [w.filename for w in caught] == ["mae_det/data/detection.py", "my_script.py"]
