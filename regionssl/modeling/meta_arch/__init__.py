from .base import RegionSSLBase
from .contrastive import ContrastiveBase
from .insloc import InsLoc
from .moco import MoCoV2
from .resim import ReSim
from .swav import SwAV
from .byol import BYOL, BYOLBase
from .scrl import SCRL
from .cvsa import CVSA
