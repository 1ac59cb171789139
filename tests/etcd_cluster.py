"""The real etcd cluster of the tests lives in the package (the fleet demo starts one too)."""

from sentinel.demo.etcd import EtcdCluster, EtcdMember, free_port, running_cluster

__all__ = ["EtcdCluster", "EtcdMember", "free_port", "running_cluster"]
