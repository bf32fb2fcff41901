"""The evaluation grid of the tests about search and training mechanics (resume, kills, rounds,
workers, the CLI): 4 patterns instead of the default 16.

Evaluating the 16 default patterns on valid and test is two thirds of a tiny trial's epoch
(measured on 2 cores: 1.8 s of 2.7 s; 0.5 s with these 4), and those tests check rows, states
and resumes, not the grid. It keeps what they need of one: the clean pattern, a random intra
rate, and two inter patterns, one of them held out of the objective (inter:L+V) so that
robust_f1 still averages a subset. The full grid has tests of its own (evaluation, live
metrics, report, protocol)."""
EVAL_GRID = ["intra:0.0", "intra:0.5", "inter:A", "inter:L+V"]
EVAL_GRID_SETTING = f"missing.eval_grid=[{','.join(EVAL_GRID)}]"  # a --set / load_config override
