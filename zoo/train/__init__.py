"""Training: the one Accelerate loop (`zoo.train.trainer`) and the tasks it trains, one plug-in module each.

A plug-in is a `zoo.train.task.Task`: its recipe schema, data, loss, sharded evaluation and report
(`classification`, `dense` for depth and segmentation, `video_fitting`; `fresh` chooses a video model's
positional encoding before fitting). They live beside the loop because nothing else runs them; the metrics,
losses and pictures they share with the command line and with users are in `zoo.tasks`.
"""
