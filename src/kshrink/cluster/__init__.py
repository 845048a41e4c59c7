"""Weight sharing (clustering): k-means centroids, trained during fine-tuning."""

from kshrink.cluster.kmeans import kmeans_1d
from kshrink.cluster.sharing import Cluster
from kshrink.layers import ClusterWrapper

__all__ = ["Cluster", "ClusterWrapper", "kmeans_1d"]
