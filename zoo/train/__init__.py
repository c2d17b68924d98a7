"""Training: the one Accelerate loop (`zoo.train.trainer`) and what it runs, one module each.

The task plug-ins are `zoo.train.task.Task` subclasses, each with its recipe schema, data, loss, sharded
evaluation and report: `classification`, `dense` (depth and segmentation) and `video_fitting`. The aids a recipe
can switch on are `fresh` (FreSh picks a video model's positional encoding before fitting) and `tract` (TrAct's
first-layer gradient). They live beside the loop because nothing else runs them; the metrics, losses and
pictures they share with the command line and with users are in `zoo.tasks`.
"""
