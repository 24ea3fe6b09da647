"""Tasks that pair a MetaFormer backbone with a head: classify, detect, segment."""
