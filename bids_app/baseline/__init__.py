"""The linear baseline: a regularised linear model on the same tensors, splits and selection rule as the network.

``stage.run_baseline_stage`` is the entry ``levels`` calls, after training and before prediction (which puts the
baseline's metrics beside the network's). ``features`` turns an image's tensor into a bounded feature vector,
``linear`` fits, scores and selects the models. See docs/baseline.md.
"""
