"""One federated round over stacked centers: the jitted simulation core."""
