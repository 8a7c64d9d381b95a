"""What only `run_detection.py` uses: data sources, augmentation and collators, training-run safety, the synthetic
shapes of the demo."""
