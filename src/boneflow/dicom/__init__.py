"""DICOM protocol and objects in and out: listener, spool, send, pixels, SR and SC."""
