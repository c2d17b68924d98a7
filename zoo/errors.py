"""The zoo's errors: one hierarchy under `ZooError`, each kind with the exit code the command line gives it.

Each class also derives from the built-in error it replaced (`ValueError`, `RuntimeError`), so code that
caught those before keeps working. `zoo` and `training/train.py` print a `ZooError` as one line and exit with
its `exit_code`; `ZOO_DEBUG=1` shows the traceback instead.
"""


class ZooError(Exception):
    """Anything the zoo refuses with a message meant for a person."""
    exit_code = 2


class InputError(ZooError, ValueError):
    """An argument, an image, a path or a model argument that cannot be used as given."""
    exit_code = 2


class UnknownModelError(ZooError, RuntimeError):
    """An unknown model name; the message suggests the closest registered names."""
    exit_code = 3


class CheckpointError(ZooError, ValueError):
    """A checkpoint that cannot be used: corrupt, of another architecture, or failing its checksum."""
    exit_code = 4


class WeightsUnavailableError(CheckpointError):
    """Weights that could not be fetched; the message names the file, where it was looked for, and the way round."""
    exit_code = 5


class RecipeError(ZooError, ValueError):
    """A recipe that cannot be run as written."""
    exit_code = 6


class BitstreamError(CheckpointError):
    """A bitstream that cannot be decoded: truncated, corrupt, of another format, or for another model."""
    exit_code = 7
