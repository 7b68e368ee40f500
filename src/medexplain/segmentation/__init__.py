"""Instance-level saliency for segmentation models: per lesion, per input channel, quantified.

Spagnolo et al., "Instance-level quantitative saliency in multiple sclerosis lesion segmentation"
(seed 001). :func:`find_instances` cuts a segmentation into lesion instances (TP / FP / FN
against a reference), :func:`instance_saliency` explains each instance per input channel (SmoothGrad
with mean or max aggregation, Grad-CAM++), :func:`quantify` turns the maps into one table row per
instance, :func:`group_statistics` compares TP / FP / FN, and :func:`context_experiment` measures how
much context around a lesion the model needs to keep detecting it.
"""
from medexplain.segmentation.instances import (
    Instance,
    check_threshold,
    find_instances,
    flatten_instances,
    label_map,
    reference_foreground,
    structure,
)
from medexplain.segmentation.quantify import context_experiment, group_statistics, markdown_table, quantify, write_csv
from medexplain.segmentation.saliency import (
    decoder_layer,
    explain_instances,
    instance_layer,
    instance_options,
    instance_saliency,
)

__all__ = ["Instance", "check_threshold", "context_experiment", "decoder_layer", "explain_instances",
           "find_instances", "flatten_instances", "group_statistics", "instance_layer", "instance_options",
           "instance_saliency",
           "label_map", "markdown_table", "quantify", "reference_foreground", "structure", "write_csv"]
