"""Explanations: what guided a prediction.

explanation.py  the DCG's saliency, the ROI boxes and their attention, the final grid, the guided prior map and
                the class scores after every sampling step, for a batch
figure.py       the figure of one explained image
outputs.py      where explanations go: PNGs for `predict --explain`, TensorBoard images during a fit"""
