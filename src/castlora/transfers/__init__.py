"""Transfer methods, registered by name. Each takes the checked inputs of one port and returns a `Port`: what
to write into the output folder and castlora.json's record. `translate` looks the method up in TRANSFERS and
writes the result atomically; a new method is one module that registers itself here."""

from .base import TRANSFERS, AdapterFiles, Port, PortInputs, adapter_writer, register_transfer

# importing the methods registers them
from . import cast, labels, weight_space  # noqa: E402,F401

__all__ = ["TRANSFERS", "register_transfer", "Port", "PortInputs", "AdapterFiles", "adapter_writer"]
