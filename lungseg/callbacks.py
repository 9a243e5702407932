"""Lightning callbacks with what a continued run needs."""

import logging
from typing import Any

from pytorch_lightning.callbacks import EarlyStopping as _EarlyStopping

log = logging.getLogger(__name__)


class EarlyStopping(_EarlyStopping):
    """Lightning's EarlyStopping, except that a continued run (``resume=true``, ``ckpt_path``)
    waits with the configured patience: Lightning 2.6 puts back the patience saved in the
    checkpoint, so ``callbacks.early_stopping.patience=30 resume=true`` had no effect. The
    epochs waited so far and the best score are restored as before."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        patience = self.patience
        super().load_state_dict(state_dict)
        if self.patience != patience:
            log.info(
                "early stopping: patience %s as configured (the checkpoint had %s)",
                patience,
                self.patience,
            )
        self.patience = patience
