"""Does the ranking predict training? Ground truth by actually training, and
every registered estimator (`dowsing.estimators`) on one leaderboard.

Modules: `subspace_truth` (the response in the concept subspace), `finetune`
(counterfactual fine-tunes and learning curves), `correlations` (rank
correlations and bootstrap intervals), `leaderboard`, `validate` (the quick
check on a user's domain set), `benchmark` (the benchmark with power),
`evidence` (what the shipped benchmark measured for each estimator, as the
verdict and the report quote it) and `figures`. The app runs validations and benchmarks as background jobs
(`dowsing.background.jobs`).
"""
