// CoreDNS for the test cluster's node, with only the plugins its Corefile (in ../cluster.sh) uses: upstream's main
// links all ~60 plugins (cloud DNS providers, tracing, ...), which would more than double the build for nothing
// the tests need. The plugin order still comes from upstream's directive list, not from these imports.
package main

import (
	"github.com/coredns/coredns/coremain"
	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/ready"
)

func main() {
	coremain.Run()
}
