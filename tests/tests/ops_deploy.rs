//! The fleet manifests (deploy/kubernetes/base): rendered with `kubectl kustomize` (when
//! installed) and validated offline against the Kubernetes schemas with `kubernetes-validate
//! --strict` (the venv `.ci/k8s-validate --setup` makes; skipped with a reason without it);
//! the DaemonSet's files and the dpu.toml it ships are checked against this build
//! (`offload dpu plan` accepts the config, the binaries it installs exist).

use std::path::{Path, PathBuf};
use std::process::Command;

fn base() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("deploy/kubernetes/base")
}

/// `kubernetes-validate`: $OFFLOAD_K8S_VENV, the target directory's k8s-venv, or PATH.
fn validator() -> Option<PathBuf> {
    let mut cands = Vec::new();
    if let Some(v) = std::env::var_os("OFFLOAD_K8S_VENV") {
        cands.push(PathBuf::from(v).join("bin/kubernetes-validate"));
    }
    if let Some(target) = tests::bin_dir().parent() {
        cands.push(target.join("k8s-venv/bin/kubernetes-validate"));
    }
    cands.push(PathBuf::from("kubernetes-validate"));
    cands.into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

fn have_kubectl() -> bool {
    Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn daemonset_base_validates_against_kubernetes_schemas() {
    const T: &str = "daemonset_base_validates_against_kubernetes_schemas";
    let Some(kv) = validator() else {
        tests::skip(
            T,
            "kubernetes-validate not installed (run .ci/k8s-validate --setup: pip venv)",
        );
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> = if have_kubectl() {
        let out = Command::new("kubectl")
            .arg("kustomize")
            .arg(base())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kubectl kustomize: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        // What the base promises: the generated ConfigMap wired into the DaemonSet, the
        // namespace applied, the image replaced, the node selector.
        for want in [
            "kind: DaemonSet",
            "kind: ConfigMap",
            "name: offload-dpu-config-",
            "namespace: offload-system",
            "image: registry.example.com/dpu-offload/offload-dpu:0.1.0",
            "dpu-offload.io/role: dpu",
            "secretName: offload-psk",
        ] {
            assert!(text.contains(want), "rendered base lacks {want:?}:\n{text}");
        }
        let p = t.path().join("rendered.yaml");
        std::fs::write(&p, text).unwrap();
        vec![p]
    } else {
        tests::skip(
            T,
            "kubectl not installed: validating resources one by one, not rendered",
        );
        vec![base().join("namespace.yaml"), base().join("daemonset.yaml")]
    };
    let out = Command::new(&kv)
        .arg("--strict")
        .args(&files)
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "kubernetes-validate:\n{report}");
    assert!(
        report.contains("daemonset/offloadd-dpu"),
        "the DaemonSet was validated:\n{report}"
    );

    // The validator bites: an unknown field fails strict validation.
    let bad = t.path().join("bad.yaml");
    let ds = std::fs::read_to_string(base().join("daemonset.yaml")).unwrap();
    std::fs::write(
        &bad,
        ds.replace(
            "hostNetwork: true",
            "hostNetwork: true\n      hostNetwrk: true",
        ),
    )
    .unwrap();
    let out = Command::new(&kv)
        .arg("--strict")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a misspelt field passed validation");
}

#[test]
fn daemonset_config_and_binaries_match_this_build() {
    // The dpu.toml the ConfigMap carries is a valid DPU config ([rootfs] included).
    let out = Command::new(tests::bin("offload"))
        .args(["dpu", "plan", "--config"])
        .arg(base().join("dpu.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "offload dpu plan rejects the DaemonSet's dpu.toml: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("/another_rootfs"));
    // Everything the kustomization lists exists.
    let k = std::fs::read_to_string(base().join("kustomization.yaml")).unwrap();
    for f in ["namespace.yaml", "daemonset.yaml", "dpu.toml"] {
        assert!(k.contains(f) && base().join(f).exists(), "{f}");
    }
    // The binaries the install step copies are the workspace's, and the options offloadd is
    // started with exist.
    let ds = std::fs::read_to_string(base().join("daemonset.yaml")).unwrap();
    let line = ds
        .lines()
        .find(|l| l.contains("for b in "))
        .expect("install loop");
    let names = line
        .split("for b in ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .expect("binary list");
    for b in names.split_whitespace() {
        assert!(tests::bin(b).exists(), "{b}");
    }
    let help = Command::new(tests::bin("offloadd"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for opt in ["--connect", "--key-file", "--config", "--control-socket"] {
        assert!(ds.contains(opt) && help.contains(opt), "{opt}");
    }
}
