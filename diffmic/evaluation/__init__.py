"""Evaluation (SPEC section 7):

evaluator.py    whole-split evaluation shared by every trainer: scores over a split, metrics once per epoch
metrics.py      single- and multi-label metrics, the confusion matrix
uncertainty.py  calibration, temperature scaling, selective prediction
figures.py      the confusion matrix, reliability diagram and risk-coverage curve as figures"""
