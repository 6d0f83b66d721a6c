"""Detection family tasks: scenes, detectors, COCO mAP and ONNX export."""
