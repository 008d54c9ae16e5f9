"""The one exception type osdiff raises for bad input, bad files and bad models."""


class OSDiffError(Exception):
    """Any failure the user can act on: unreadable image, corrupt or foreign `.osd` file,
    missing model, refused overwrite. The message is one line that says what is wrong."""


class OSDiffWarning(UserWarning):
    """Something was changed in the input to make it codable (alpha dropped, first frame)."""


class InputTooLarge(OSDiffError):
    """An input over a configured size limit (bytes or pixels); raised before it is decoded."""


class TargetUnreachable(OSDiffError):
    """A target file size that even the lowest quality exceeds, with `strict` encoding."""
