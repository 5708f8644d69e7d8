//! The parts of OCI and Docker v2 manifests, indexes and image configs that berth reads, and
//! the choice of the host platform's manifest in an index.

use serde::{Deserialize, Serialize};

use super::reference::is_digest;

/// A content descriptor.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub size: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
}

/// A manifest or an index (manifest list), told apart by which fields are present.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestOrIndex {
    #[serde(default)]
    pub schema_version: i64,
    #[serde(default)]
    pub media_type: Option<String>,
    pub manifests: Option<Vec<Descriptor>>,
    pub config: Option<Descriptor>,
    pub layers: Option<Vec<Descriptor>>,
}

/// An image manifest's config and layers.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// The parts of an image config berth uses.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct ImageConfig {
    #[serde(default)]
    pub rootfs: RootFs,
    #[serde(default)]
    pub config: Option<ExecConfig>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct ExecConfig {
    #[serde(default)]
    pub user: Option<String>,
}

/// The GOARCH name of the machine berthd runs on.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "arm" => "arm",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => other,
    }
}

impl ManifestOrIndex {
    pub fn parse(bytes: &[u8]) -> Result<ManifestOrIndex, String> {
        let m: ManifestOrIndex = serde_json::from_slice(bytes)
            .map_err(|e| format!("manifest is not valid JSON: {e}"))?;
        if m.schema_version != 2 {
            return Err(format!(
                "unsupported manifest schema version {} (only 2)",
                m.schema_version
            ));
        }
        for d in m
            .manifests
            .iter()
            .flatten()
            .chain(m.layers.iter().flatten())
            .chain(m.config.iter())
        {
            if !is_digest(&d.digest) {
                return Err(format!("unsupported digest {:?}", d.digest));
            }
            if d.size < 0 {
                return Err(format!("negative size for {}", d.digest));
            }
        }
        Ok(m)
    }

    /// The image manifest, if this is one.
    pub fn into_manifest(self) -> Result<Manifest, String> {
        match (self.config, self.layers) {
            (Some(config), Some(layers)) => Ok(Manifest { config, layers }),
            _ => Err("not an image manifest (no config or layers)".to_string()),
        }
    }

    /// For an index: the descriptor of the linux manifest for this host's architecture.
    pub fn pick_platform(&self, arch: &str) -> Option<&Descriptor> {
        let list = self.manifests.as_ref()?;
        let wanted_variant = if arch == "arm64" { Some("v8") } else { None };
        let candidates: Vec<&Descriptor> = list
            .iter()
            .filter(|d| {
                d.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == arch)
            })
            .collect();
        candidates
            .iter()
            .find(|d| d.platform.as_ref().and_then(|p| p.variant.as_deref()) == wanted_variant)
            .or(candidates.first())
            .copied()
    }

    pub fn is_index(&self) -> bool {
        self.manifests.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn picks_the_host_platform_from_an_index() {
        let idx = format!(
            r#"{{"schemaVersion":2,"manifests":[
              {{"mediaType":"m","digest":"{}","size":1,"platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}},
              {{"mediaType":"m","digest":"{}","size":1,"platform":{{"architecture":"amd64","os":"windows"}}}},
              {{"mediaType":"m","digest":"{}","size":1,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#,
            d('a'),
            d('b'),
            d('c')
        );
        let m = ManifestOrIndex::parse(idx.as_bytes()).expect("parses");
        assert!(m.is_index());
        assert_eq!(
            m.pick_platform("amd64").map(|d| d.digest.clone()),
            Some(d('c'))
        );
        assert_eq!(
            m.pick_platform("arm64").map(|d| d.digest.clone()),
            Some(d('a'))
        );
        assert!(m.pick_platform("s390x").is_none());
    }

    #[test]
    fn rejects_bad_manifests() {
        assert!(ManifestOrIndex::parse(b"{").is_err());
        assert!(ManifestOrIndex::parse(br#"{"schemaVersion":1}"#).is_err());
        let bad = r#"{"schemaVersion":2,"config":{"digest":"md5:x","size":1},"layers":[]}"#;
        assert!(ManifestOrIndex::parse(bad.as_bytes()).is_err());
        let ok = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{}","size":1}},"layers":[]}}"#,
            d('e')
        );
        let m = ManifestOrIndex::parse(ok.as_bytes()).expect("parses");
        assert!(m.into_manifest().is_ok());
    }
}
