"""The network and what is computed from it: VGG16, weights, partition, loss, metrics."""
