"""Compressed models people can use: small files, loadable without this project, and fast forwards.

* :mod:`export.formats`: bitmask / N:M layouts (pack, unpack, byte counts).
* :mod:`export.exporter`: :func:`export_model`, :func:`export_from_dir`, :func:`size_report`.
* :mod:`export.peft_adapter`: the low-rank part of OATS layers as a PEFT LoRA adapter.
* :mod:`export.oats_bitmask`: the standalone reader copied next to every bitmask export.
* (the forward a SparseLowRankLinear runs, chosen by measurement, and the compiled kernel live beside
  it: ``factored.forward``, ``factored.kernels``).
"""
from export.exporter import COMPRESSED_TENSORS_NOTE, FORMATS, export_from_dir, export_model, plain_state_dict, size_report
from export.formats import (bitmask_bytes, choose_layout, dense_bytes, is_nm, nm_bytes, pack_bitmask, pack_nm,
                            unpack_bitmask, unpack_nm)
from export.peft_adapter import write_lora_adapter

__all__ = ["COMPRESSED_TENSORS_NOTE", "FORMATS", "export_from_dir", "export_model", "plain_state_dict", "size_report",
           "bitmask_bytes", "choose_layout", "dense_bytes", "is_nm", "nm_bytes", "pack_bitmask", "pack_nm",
           "unpack_bitmask", "unpack_nm", "write_lora_adapter"]
