"""boneflow: a fracture second opinion on radiographs, as a DICOM node (not for diagnostic use)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("boneflow")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

PRODUCT_NAME = "boneflow"
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
