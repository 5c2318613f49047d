//! The test cluster's real node (`cluster.sh up --node`): it is Ready, Pods of a locally built image run,
//! `kubectl logs` and `kubectl exec` reach them, Pods resolve Service names through CoreDNS and reach
//! ClusterIPs through kube-proxy, and the host and the Pods reach each other.
//! Without a node (`STASH_NODE_IP` unset: plain `cargo test`) these tests say so and pass; `scripts/test.sh`
//! always runs them with one.

mod support;

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::api::{Api, ListParams, PostParams};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::time::Duration;
use support::TestNamespace;
use support::node::{self, TAINT, kubectl, running};

const TOOLBOX: &str = "stash.local/toolbox:dev";
/// Pods start in about 2 s; this only guards against a hang.
const START_LIMIT: Duration = Duration::from_secs(90);
const ECHO_PORT: u16 = 8080;

/// The node's IP, after importing the toolbox image; `None` (and a note) when the cluster has no node.
fn node_with_toolbox(test: &str) -> Option<Ipv4Addr> {
    let Some(ip) = node::node_ip() else {
        eprintln!("{test}: skipped, no node (STASH_NODE_IP unset; scripts/test.sh brings one up)");
        return None;
    };
    node::import_images(&["toolbox"]);
    Some(ip)
}

/// A toolbox Pod running `script` with `sh -c`.
fn toolbox_pod(name: &str, labels: Value, script: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "main", "image": TOOLBOX, "imagePullPolicy": "Never",
                "command": ["sh", "-c", script],
            }],
        },
    }))
    .expect("a Pod")
}

/// A Pod answering every TCP connection on ECHO_PORT with `greeting` and a newline (perl is Essential in
/// Debian, so the toolbox has it).
fn echo_server(name: &str, greeting: &str) -> Pod {
    let script = format!(
        "exec perl -MIO::Socket::INET -e '$s = IO::Socket::INET->new(LocalPort => {ECHO_PORT}, Listen => 8, \
         ReuseAddr => 1) or die $!; while ($c = $s->accept) {{ print $c \"{greeting}\\n\"; close $c }}'"
    );
    toolbox_pod(name, json!({"app": name}), &script)
}

/// `kubectl exec` of `script` (bash) in the Pod's container; its stdout, or a panic with its stderr.
fn exec(ns: &str, pod: &str, script: &str) -> String {
    let out = kubectl(&["-n", ns, "exec", pod, "--", "timeout", "20", "bash", "-c", script]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "exec {script:?} in {pod}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// What a TCP server at `host:port` says first (bash's /dev/tcp resolves names like any program).
fn tcp_read(host: &str, port: u16) -> String {
    format!("exec 3<>/dev/tcp/{host}/{port} && cat <&3")
}

#[tokio::test]
async fn the_node_is_ready_and_tainted_for_tests_that_opt_in() {
    if node::node_ip().is_none() {
        eprintln!("skipped: no node (STASH_NODE_IP unset; scripts/test.sh brings one up)");
        return;
    }
    let nodes: Api<Node> = Api::all(support::client().await);
    let nodes = nodes.list(&ListParams::default()).await.expect("list Nodes").items;
    assert_eq!(nodes.len(), 1, "one node");
    let status = nodes[0].status.clone().expect("node status");
    let ready = status.conditions.iter().flatten().find(|c| c.type_ == "Ready").expect("a Ready condition");
    assert_eq!(ready.status, "True", "{ready:?}");
    let taints = nodes[0].spec.clone().and_then(|s| s.taints).unwrap_or_default();
    assert_eq!(taints.iter().map(|t| (t.key.as_str(), t.effect.as_str())).collect::<Vec<_>>(), [(TAINT, "NoSchedule")]);

    let out = kubectl(&["get", "nodes", "--no-headers"]);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.contains(" Ready "), "kubectl get nodes: {listed}");
}

#[tokio::test]
async fn a_pod_runs_and_kubectl_logs_and_exec_reach_it() {
    if node_with_toolbox("a_pod_runs").is_none() {
        return;
    }
    let ns = TestNamespace::new("node-pod").await;
    node::schedule_on_node(&ns).await;
    let pods = ns.api::<Pod>();
    let pod = toolbox_pod("hello", json!({}), "echo hello from the node; exec sleep 3600");
    pods.create(&PostParams::default(), &pod).await.expect("Pod created");
    running(&pods, "hello", START_LIMIT).await;

    support::eventually("the Pod's log", Duration::from_secs(30), || {
        let ns = ns.name.clone();
        async move {
            let out = kubectl(&["-n", &ns, "logs", "hello"]);
            String::from_utf8_lossy(&out.stdout).contains("hello from the node").then_some(())
        }
    })
    .await;
    assert_eq!(exec(&ns.name, "hello", "cat /etc/hostname").trim(), "hello");
}

#[tokio::test]
async fn pods_resolve_services_and_reach_a_cluster_ip_by_name() {
    if node_with_toolbox("pods_resolve_services").is_none() {
        return;
    }
    let ns = TestNamespace::new("node-dns").await;
    node::schedule_on_node(&ns).await;
    let pods = ns.api::<Pod>();
    pods.create(&PostParams::default(), &echo_server("echo", "hello from echo")).await.expect("server Pod");
    let client = toolbox_pod("client", json!({}), "exec sleep 3600");
    pods.create(&PostParams::default(), &client).await.expect("client Pod");
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "echo"},
        "spec": {"selector": {"app": "echo"}, "ports": [{"port": 80, "targetPort": ECHO_PORT}]},
    }))
    .expect("a Service");
    ns.api::<Service>().create(&PostParams::default(), &service).await.expect("Service created");
    running(&pods, "echo", START_LIMIT).await;
    running(&pods, "client", START_LIMIT).await;

    let services: Api<Service> = Api::namespaced(ns.client.clone(), "default");
    let api_ip = services.get("kubernetes").await.expect("kubernetes Service").spec.and_then(|s| s.cluster_ip);
    let resolved = exec(&ns.name, "client", "getent hosts kubernetes.default.svc.cluster.local");
    assert_eq!(resolved.split_whitespace().next(), api_ip.as_deref(), "{resolved}");

    let name = format!("echo.{}.svc.cluster.local", ns.name);
    // The Service's endpoints reach kube-proxy a moment after the Pod runs.
    support::eventually("the echo Service by name", Duration::from_secs(30), || {
        let script = tcp_read(&name, 80);
        let ns = ns.name.clone();
        async move {
            let out = kubectl(&["-n", &ns, "exec", "client", "--", "timeout", "5", "bash", "-c", &script]);
            String::from_utf8_lossy(&out.stdout).contains("hello from echo").then_some(())
        }
    })
    .await;
    // The short name, through the Pod's search path.
    assert_eq!(exec(&ns.name, "client", &tcp_read("echo", 80)).trim(), "hello from echo");
}

#[tokio::test]
async fn the_host_and_pods_reach_each_other() {
    let Some(node_ip) = node_with_toolbox("the_host_and_pods") else {
        return;
    };
    let ns = TestNamespace::new("node-net").await;
    node::schedule_on_node(&ns).await;
    let pods = ns.api::<Pod>();
    pods.create(&PostParams::default(), &echo_server("echo", "hello from a Pod")).await.expect("server Pod");
    let pod = running(&pods, "echo", START_LIMIT).await;
    let pod_ip = pod.status.and_then(|s| s.pod_ip).expect("a Pod IP");

    let said = support::eventually("the Pod's server from the host", Duration::from_secs(30), || {
        let pod_ip = pod_ip.clone();
        async move {
            let mut stream = TcpStream::connect((pod_ip.as_str(), ECHO_PORT)).ok()?;
            let mut said = String::new();
            stream.read_to_string(&mut said).ok()?;
            Some(said)
        }
    })
    .await;
    assert_eq!(said.trim(), "hello from a Pod");

    // A server on the host, listening on the node IP only, as a test's backend would.
    let listener = TcpListener::bind((node_ip, 0)).expect("bind the node IP");
    let port = listener.local_addr().expect("address").port();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("a connection from the Pod");
        stream.write_all(b"hello from the host\n").expect("write");
    });
    let said = exec(&ns.name, "echo", &tcp_read(&node_ip.to_string(), port));
    assert_eq!(said.trim(), "hello from the host");
    server.join().expect("server thread");
}
