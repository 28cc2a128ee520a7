// Command kube-controller-manager is the upstream Kubernetes controller manager, built from the
// version pinned in e2e/versions.env. Upstream's own main package cannot be imported, so this
// repeats its wiring.
package main

import (
	"os"
	// CronJob time zones must resolve without the host's zoneinfo.
	_ "time/tzdata"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	"k8s.io/kubernetes/cmd/kube-controller-manager/app"
)

func main() {
	os.Exit(cli.Run(app.NewControllerManagerCommand()))
}
