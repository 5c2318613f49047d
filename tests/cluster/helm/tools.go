//go:build tools

// Package tools only pins the binary built by ../build.sh.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
