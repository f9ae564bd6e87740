from .base import RegionSSLBase
from .contrastive import ContrastiveBase
from .insloc import InsLoc
from .moco import MoCoV2
