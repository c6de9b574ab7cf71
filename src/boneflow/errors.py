"""The exceptions boneflow raises, named for what the caller does next."""


class BoneflowError(Exception):
    """Base of every error boneflow raises on purpose."""


class ConfigError(BoneflowError):
    """A configuration value is invalid; the program stops at start."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        super().__init__(f"BONEFLOW_{key}: {problem}")


class UnreadableInstance(BoneflowError):
    """A DICOM instance cannot be parsed or decoded; record it as failed and go on."""


class DestinationUnavailable(BoneflowError):
    """A destination could not be reached right now; retry later."""


class DestinationRefused(BoneflowError):
    """A destination answered but refused the object; retrying will not help."""


class ModelNotFound(BoneflowError):
    """No registered model matches the request."""


class ModelIntegrityError(BoneflowError):
    """A registered model's files do not match its manifest (tampered or truncated)."""


class NotImplementedYet(BoneflowError):
    """A command whose capability has not landed yet."""
