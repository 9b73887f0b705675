"""Does the ranking predict training? Ground truth by actually training, and
rival estimators on one leaderboard.

Modules: `split` (the training / held-out split and the shipped benchmark
domains), `estimators` (every estimator as a named function of the training
facts), `ekfac` (EK-FAC influence through kronfluence), `subspace_truth` (the
response in the concept subspace), `finetune` (counterfactual fine-tunes and
learning curves), `correlations` (rank correlations and bootstrap intervals),
`leaderboard`, `validate` (the quick check on a user's domain set) and
`benchmark` (the benchmark with power). The app runs both as background jobs
(`dowsing.jobs`).
"""
