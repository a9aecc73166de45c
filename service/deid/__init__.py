"""De-identification of what leaves the node (DICOM PS3.15 Annex E) and re-identification.

* :func:`deidentify_dataset`, :func:`deidentify_file`: the Basic Application
  Level Confidentiality Profile with the Retain Longitudinal Temporal
  Information and Clean Descriptors options, consistent UID remapping.
* :func:`reidentify`: map a returning data set's pseudonyms back.
* :func:`lookup`: the original value of a pseudonym (admin only).

See docs/deidentification.md.
"""

from service.deid.mapping import Pseudonym, lookup
from service.deid.profile import (
    DeidentificationError,
    deidentify_dataset,
    deidentify_file,
    options_of,
    reidentify,
    scope_of,
)

__all__ = ["DeidentificationError", "Pseudonym", "deidentify_dataset", "deidentify_file",
           "lookup", "options_of", "reidentify", "scope_of"]
