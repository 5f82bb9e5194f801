//! The deployment files in `regions/` describe one consistent cluster: every region config loads
//! with the real loader, names itself after its file, lists exactly the other regions as peers
//! at their compose service names, and docker-compose.yml / prometheus.yml run and scrape each
//! region with its own file.

use meridian_region::config::Config;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Once;

/// The regions documented in shared/API.md; the deployment must contain at least these.
const DOCUMENTED_REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];
const PORT: u16 = 7001;

fn regions_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../regions")
}

fn repo_file(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// `Config::load` applies `MERIDIAN_*` overrides: drop them so only the files are tested.
/// Every test that loads a config calls this first; `Once` makes later callers wait until the
/// removal is done, so no test reads the environment while it changes.
fn clear_meridian_env() {
    static CLEAR: Once = Once::new();
    CLEAR.call_once(|| {
        let names: Vec<_> = std::env::vars_os()
            .filter_map(|(name, _)| {
                name.to_str()
                    .filter(|n| n.to_ascii_uppercase().starts_with("MERIDIAN_"))
                    .map(str::to_owned)
            })
            .collect();
        for name in names {
            std::env::remove_var(name);
        }
    });
}

/// Every `regions/*.toml`, loaded with the real loader: (file stem, config).
fn load_region_configs() -> Vec<(String, Config)> {
    clear_meridian_env();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(regions_dir())
        .expect("regions/ exists")
        .map(|entry| entry.expect("readable regions/ entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .expect("UTF-8 file name")
                .to_owned();
            let config = Config::load(Some(&path))
                .unwrap_or_else(|e| panic!("{} does not load: {e}", path.display()));
            config
                .validate()
                .unwrap_or_else(|e| panic!("{} is invalid: {e}", path.display()));
            (stem, config)
        })
        .collect()
}

#[test]
fn region_configs_describe_one_cluster() {
    let configs = load_region_configs();
    let names: BTreeSet<String> = configs.iter().map(|(stem, _)| stem.clone()).collect();
    for region in DOCUMENTED_REGIONS {
        assert!(names.contains(region), "regions/{region}.toml is missing");
    }
    assert_eq!(names.len(), configs.len());

    let cluster_id = &configs[0].1.cluster_id;
    let mut seen_regions = BTreeSet::new();
    for (stem, config) in &configs {
        let region = config.region.to_string();
        assert_eq!(&region, stem, "regions/{stem}.toml names region {region}");
        assert!(seen_regions.insert(region.clone()), "region {region} twice");
        assert_eq!(
            &config.cluster_id, cluster_id,
            "{stem}: cluster_id differs from {}",
            configs[0].0
        );
        assert_eq!(config.listen.port(), PORT, "{stem}: listen port");

        let peers: BTreeSet<String> = config.peers.keys().map(|p| p.to_string()).collect();
        let others: BTreeSet<String> = names.iter().filter(|n| *n != stem).cloned().collect();
        assert_eq!(
            peers, others,
            "{stem}: peers must be exactly the other regions"
        );
        for (peer, url) in &config.peers {
            assert_eq!(
                url,
                &format!("http://{peer}:{PORT}"),
                "{stem}: URL of {peer}"
            );
        }

        let everyone: BTreeSet<String> = config.regions().iter().map(|r| r.to_string()).collect();
        assert_eq!(
            everyone, names,
            "{stem}: region + peers is not the whole cluster"
        );
    }
}

/// The lines of top-level service `name` in a compose file: from `  name:` to the next line
/// indented by at most two spaces. Plain text, so no YAML parser is needed.
fn compose_service<'a>(compose: &'a str, name: &str) -> Option<Vec<&'a str>> {
    let header = format!("  {name}:");
    let mut lines = compose.lines().skip_while(|line| line.trim_end() != header);
    lines.next()?;
    let body = lines
        .take_while(|line| line.trim().is_empty() || line.starts_with("   "))
        .collect();
    Some(body)
}

#[test]
fn compose_runs_each_region_with_its_own_config() {
    let compose = repo_file("regions/docker-compose.yml");
    for (region, _) in load_region_configs() {
        let service = compose_service(&compose, &region)
            .unwrap_or_else(|| panic!("docker-compose.yml has no service {region}"));
        let has = |text: &str| service.iter().any(|line| line.contains(text));
        assert!(
            has(&format!("./{region}.toml:/etc/meridian/meridian.toml:ro")),
            "service {region} does not mount {region}.toml read-only as its config"
        );
        assert!(
            has(&format!("{region}-data:/var/lib/meridian")),
            "service {region} has no data volume of its own"
        );
        assert!(
            has(&format!(":{PORT}\"")),
            "service {region} does not publish port {PORT}"
        );
    }
}

#[test]
fn prometheus_scrapes_each_region() {
    let prometheus = repo_file("observability/prometheus/prometheus.yml");
    for (region, _) in load_region_configs() {
        assert!(
            prometheus.contains(&format!("\"{region}:{PORT}\"")),
            "prometheus.yml does not scrape {region}"
        );
    }
}
