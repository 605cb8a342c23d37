"""Santurkar et al.'s line probe along training: loss landscape, gradient predictiveness, effective β."""
from experiments.features.base import Feature
from experiments.features.probe.measurement import PROBE

FEATURE = Feature("probe", "Santurkar's line probe every --probe-every steps (Fig. 4)", measurement=PROBE,
                  figures=("experiments.features.probe.figures:SANTURKAR_FIG4",),
                  report="experiments.features.probe.tables:report_section")
