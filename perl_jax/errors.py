"""Errors a user can fix: `main` prints their one-line message and exits with code 2 (3 when
training stopped itself), keeping tracebacks for bugs (and for these behind --verbose)."""


class UserError(Exception):
  """A problem in the config, the data or the workdir, described in one line."""


class ConfigError(UserError, ValueError):
  """Config fields that cannot work; the message holds one line per problem."""


class WorkdirMismatch(UserError):
  """The workdir holds a run of a different config, data or backbone."""


class TrainingStopped(UserError, FloatingPointError):
  """Training stopped on a non-finite or stuck loss; the last good checkpoint is kept."""
