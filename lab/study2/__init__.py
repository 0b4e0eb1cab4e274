"""Study 2 of the real-model experiment (docs/real_model/PREREG.md): its data splits, as indices."""
