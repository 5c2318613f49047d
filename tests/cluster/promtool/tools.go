//go:build tools

// Package tools only pins the binary built by ../build.sh.
package tools

import _ "github.com/prometheus/prometheus/cmd/promtool"
