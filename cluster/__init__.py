"""KubeRay: render specs to RayJob / RayCronJob / RayService / RayCluster manifests, check them
against the CRDs and KubeRay's rules, and apply them with the official ``kubernetes`` client."""
