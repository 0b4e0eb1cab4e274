"""User-facing errors: the CLIs print these as one line, without a traceback."""


class UserError(Exception):
    """A problem with the user's input or flags, reported as one line."""


class InputError(UserError, ValueError):
    """A bad record: names the file, the line and the field."""

    def __init__(self, path, line, field, problem):
        self.path, self.line, self.field, self.problem = str(path), line, field, problem
        where = f"{self.path}:{line}" if line is not None else self.path
        field_part = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{field_part} {problem}")


class MetadataMismatch(UserError):
    """Two stages disagree on what they were made from."""
