"""Model and data analysis behind tools/analyze_model.py and tools/visualize_data.py: applications above engine/."""
