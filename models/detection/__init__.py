"""Detection family models: ShuffleNetV2/SNet, MobileNet and Inception backbones, ThunderNet, FCOS,
box ops, PSRoIAlign and COCO evaluation."""
