"""The SQuAD v1.1 data path: featurization, the feature cache, accuracy and the official evaluation."""

#: Features of the official dev set under the MLPerf parameters (384 / 128 / 64): the QSL size,
#: the performance sample count and the sample count an accuracy run must cover.
DEV_FEATURES = 10833
