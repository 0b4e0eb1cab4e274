"""User-facing errors: the CLIs print these as one line, without a traceback."""


class UserError(Exception):
    """A problem with the user's input or flags, reported as one line."""


class InputError(UserError, ValueError):
    """A bad record: names the file, the line and the field."""

    def __init__(self, path, line, field, problem, record=None):
        self.path, self.line, self.field, self.problem, self.record = str(path), line, field, problem, record
        where = f"{self.path}:{line}" if line is not None else self.path
        if record is not None:  # a JSON array's records may share one line: the 0-based index finds it
            where += f" (record {record})"
        field_part = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{field_part} {problem}")


class MetadataMismatch(UserError):
    """Two stages disagree on what they were made from."""
