"""Building blocks shared by several weight-space methods: equivariant layers, graph construction, augmentation."""
