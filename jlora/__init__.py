"""jlora: functional LoRA for JAX and Flax.

>>> import jlora
>>> cfg = jlora.LoraConfig(rank=8, alpha=16.0, targets=r".*/(query|value)/kernel")
"""

from jlora._bank import put as put
from jlora._bank import stack as stack
from jlora._bank import unstack as unstack
from jlora._checkpoint import read_metadata as read_metadata
from jlora._checkpoint import restore as restore
from jlora._checkpoint import save as save
from jlora._checkpoint import save_args as save_args
from jlora._combine import CombineReport as CombineReport
from jlora._combine import combine as combine
from jlora._config import NONLINEARITIES as NONLINEARITIES
from jlora._config import LoraConfig as LoraConfig
from jlora._config import Rule as Rule
from jlora._dylora import rank_sweep as rank_sweep
from jlora._dylora import truncate as truncate
from jlora._gguf import export_gguf as export_gguf
from jlora._gguf import import_gguf as import_gguf
from jlora._infer import infer_layouts as infer_layouts
from jlora._init import init as init
from jlora._layout import Layout as Layout
from jlora._layout import LayoutError as LayoutError
from jlora._merge import merge as merge
from jlora._merge import unmerge as unmerge
from jlora._optimizer import optimizer as optimizer
from jlora._peft import export_peft as export_peft
from jlora._peft import import_peft as import_peft
from jlora._quant import QArray as QArray
from jlora._quantize import dequantize as dequantize
from jlora._quantize import quantize as quantize
from jlora._rewrite import Use as Use
from jlora._sharding import shardings as shardings
from jlora._summary import summary as summary
from jlora._version import __version__ as __version__
from jlora._wrap import LoraApply as LoraApply
from jlora._wrap import wrap as wrap

__all__ = [
    "CombineReport",
    "NONLINEARITIES",
    "QArray",
    "Layout",
    "LayoutError",
    "LoraApply",
    "LoraConfig",
    "Rule",
    "Use",
    "combine",
    "dequantize",
    "export_gguf",
    "export_peft",
    "import_gguf",
    "import_peft",
    "infer_layouts",
    "init",
    "merge",
    "optimizer",
    "put",
    "quantize",
    "read_metadata",
    "rank_sweep",
    "restore",
    "save",
    "save_args",
    "shardings",
    "stack",
    "summary",
    "truncate",
    "unmerge",
    "unstack",
    "wrap",
]
