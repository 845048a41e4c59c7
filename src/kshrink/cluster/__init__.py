"""Weight sharing (clustering): k-means centroids, trained during fine-tuning."""

from kshrink.cluster.kmeans import kmeans_1d
from kshrink.cluster.sharing import Cluster, ClusterOverride
from kshrink.layers import ClusterWrapper

__all__ = ["Cluster", "ClusterOverride", "ClusterWrapper", "kmeans_1d"]
