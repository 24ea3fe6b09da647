"""What detection and segmentation share, and the one task package the others may import: the backbone
with its FPN neck (``fpn``), their common options (``options``), files (``files``) and data (``data``)."""
