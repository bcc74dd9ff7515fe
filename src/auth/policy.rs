//! Secondary authorization (spec §2.2): an optional per-key-store policy over the request's
//! metadata, applied after SigV4 to GetKeyMetadata, Encrypt and Decrypt, never to GetHealthStatus.
//!
//! A policy is an ordered list of rules and a default effect. A rule matches when every condition it
//! sets matches; conditions are lists of glob patterns (`*` any run of characters, `?` one
//! character) over `awsPrincipalArn`, `kmsOperation`, the key id, `awsSourceVpc`, `awsSourceVpce`,
//! `kmsKeyArn` and `kmsViaService`. A condition on a field the request does not carry does not
//! match (KMS sends the VPC fields only for calls through a VPC endpoint by the key's owner). The
//! first matching rule decides; with none, the default does. A denial names the rule (or the
//! default) so that the log says which statement to fix.
//!
//! ```toml
//! [keystore.policy]
//! default = "deny"
//! [[keystore.policy.rule]]
//! name = "app-account"
//! effect = "allow"
//! principals = ["arn:aws:iam::111122223333:*"]
//! operations = ["Encrypt", "Decrypt", "GenerateDataKey*", "ReEncrypt", "CreateKey", "DescribeKey"]
//! keys = ["app-*"]
//! ```

use serde::Deserialize;
use wildmatch::WildMatch;

use crate::api::types::RequestMetadata;

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    Allow,
    Deny,
}

/// `[keystore.policy]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub default: Effect,
    #[serde(default)]
    pub rule: Vec<RuleConfig>,
}

/// One `[[keystore.policy.rule]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    pub effect: Effect,
    pub principals: Option<Vec<String>>,
    pub operations: Option<Vec<String>>,
    pub keys: Option<Vec<String>>,
    pub source_vpcs: Option<Vec<String>>,
    pub source_vpces: Option<Vec<String>>,
    pub kms_key_arns: Option<Vec<String>>,
    pub via_services: Option<Vec<String>>,
}

/// A compiled policy.
#[derive(Debug)]
pub struct Policy {
    default: Effect,
    rules: Vec<Rule>,
}

#[derive(Debug)]
struct Rule {
    name: String,
    effect: Effect,
    conditions: Vec<(Field, Vec<WildMatch>)>,
}

#[derive(Debug, Clone, Copy)]
enum Field {
    Principal,
    Operation,
    Key,
    SourceVpc,
    SourceVpce,
    KmsKeyArn,
    ViaService,
}

/// The outcome of an authorization check: the effect and the statement that decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub effect: Effect,
    /// The rule's name, or `default`.
    pub statement: String,
}

impl Policy {
    /// Compiles a policy; errors name the rule and field.
    pub fn compile(config: &PolicyConfig) -> Result<Self, String> {
        let mut rules = Vec::with_capacity(config.rule.len());
        for (i, rule) in config.rule.iter().enumerate() {
            if rule.name.trim().is_empty() {
                return Err(format!("rule[{i}].name: must not be empty"));
            }
            if config.rule[..i].iter().any(|r| r.name == rule.name) {
                return Err(format!("rule[{i}].name: {:?} is used twice", rule.name));
            }
            let mut conditions = Vec::new();
            for (field, name, patterns) in [
                (Field::Principal, "principals", &rule.principals),
                (Field::Operation, "operations", &rule.operations),
                (Field::Key, "keys", &rule.keys),
                (Field::SourceVpc, "source_vpcs", &rule.source_vpcs),
                (Field::SourceVpce, "source_vpces", &rule.source_vpces),
                (Field::KmsKeyArn, "kms_key_arns", &rule.kms_key_arns),
                (Field::ViaService, "via_services", &rule.via_services),
            ] {
                if let Some(patterns) = patterns {
                    if patterns.is_empty() {
                        return Err(format!(
                            "rule[{i}].{name}: an empty list matches nothing; remove it to match anything"
                        ));
                    }
                    conditions.push((field, patterns.iter().map(|p| WildMatch::new(p)).collect()));
                }
            }
            rules.push(Rule {
                name: rule.name.clone(),
                effect: rule.effect,
                conditions,
            });
        }
        Ok(Self {
            default: config.default,
            rules,
        })
    }

    /// The decision for one request.
    pub fn decide(&self, key_id: &str, metadata: &RequestMetadata) -> Decision {
        let value = |field: Field| -> Option<&str> {
            match field {
                Field::Principal => metadata.aws_principal_arn.as_deref(),
                Field::Operation => Some(metadata.kms_operation.as_str()),
                Field::Key => Some(key_id),
                Field::SourceVpc => metadata.aws_source_vpc.as_deref(),
                Field::SourceVpce => metadata.aws_source_vpce.as_deref(),
                Field::KmsKeyArn => metadata.kms_key_arn.as_deref(),
                Field::ViaService => metadata.kms_via_service.as_deref(),
            }
        };
        let matching = self.rules.iter().find(|rule| {
            rule.conditions.iter().all(|(field, patterns)| {
                value(*field).is_some_and(|v| patterns.iter().any(|p| p.matches(v)))
            })
        });
        match matching {
            Some(rule) => Decision {
                effect: rule.effect,
                statement: rule.name.clone(),
            },
            None => Decision {
                effect: self.default,
                statement: "default".into(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Policy {
        Policy::compile(&toml::from_str(text).unwrap()).unwrap()
    }

    fn metadata(principal: &str, operation: &str, vpc: Option<&str>) -> RequestMetadata {
        RequestMetadata {
            kms_request_id: "r".into(),
            kms_operation: operation.into(),
            aws_principal_arn: Some(principal.into()),
            kms_key_arn: Some("arn:aws:kms:us-east-1:111122223333:key/k".into()),
            kms_via_service: None,
            aws_source_vpc: vpc.map(Into::into),
            aws_source_vpce: None,
        }
    }

    const POLICY: &str = r#"
default = "deny"
[[rule]]
name = "no-bob"
effect = "deny"
principals = ["arn:aws:iam::111122223333:user/bob"]
[[rule]]
name = "app"
effect = "allow"
principals = ["arn:aws:iam::111122223333:*"]
operations = ["Encrypt", "Decrypt", "GenerateDataKey*"]
keys = ["app-*"]
[[rule]]
name = "from-vpc"
effect = "allow"
source_vpcs = ["vpc-0abc"]
"#;

    #[test]
    fn first_match_wins_and_default_applies() {
        let p = policy(POLICY);
        let d = p.decide(
            "app-1",
            &metadata("arn:aws:iam::111122223333:user/alice", "Encrypt", None),
        );
        assert_eq!((d.effect, d.statement.as_str()), (Effect::Allow, "app"));
        let d = p.decide(
            "app-1",
            &metadata("arn:aws:iam::111122223333:user/bob", "Encrypt", None),
        );
        assert_eq!((d.effect, d.statement.as_str()), (Effect::Deny, "no-bob"));
        let d = p.decide(
            "app-1",
            &metadata(
                "arn:aws:iam::111122223333:user/alice",
                "GenerateDataKeyWithoutPlaintext",
                None,
            ),
        );
        assert_eq!(d.effect, Effect::Allow);
        let d = p.decide(
            "other",
            &metadata("arn:aws:iam::111122223333:user/alice", "Encrypt", None),
        );
        assert_eq!((d.effect, d.statement.as_str()), (Effect::Deny, "default"));
        let d = p.decide(
            "app-1",
            &metadata("arn:aws:iam::999999999999:root", "SomeNewOperation", None),
        );
        assert_eq!(d.statement, "default");
    }

    #[test]
    fn absent_fields_do_not_match_conditions_on_them() {
        let p = policy(POLICY);
        let d = p.decide("x", &metadata("ec2.amazonaws.com", "Decrypt", None));
        assert_eq!(d.statement, "default");
        let d = p.decide(
            "x",
            &metadata("ec2.amazonaws.com", "Decrypt", Some("vpc-0abc")),
        );
        assert_eq!(
            (d.effect, d.statement.as_str()),
            (Effect::Allow, "from-vpc")
        );
    }

    #[test]
    fn each_condition_reads_its_own_field() {
        let wrong = "arn:aws:iam::999999999999:user/nobody";
        let all_wrong = RequestMetadata {
            kms_request_id: "r".into(),
            kms_operation: wrong.into(),
            aws_principal_arn: Some(wrong.into()),
            kms_key_arn: Some(wrong.into()),
            kms_via_service: Some(wrong.into()),
            aws_source_vpc: Some(wrong.into()),
            aws_source_vpce: Some(wrong.into()),
        };
        let conditions = [
            ("principals", "arn:aws:iam::111122223333:role/*"),
            ("operations", "Decrypt"),
            ("keys", "k?"),
            ("source_vpcs", "vpc-0abc"),
            ("source_vpces", "vpce-0def"),
            ("kms_key_arns", "arn:aws:kms:us-east-1:111122223333:key/*"),
            ("via_services", "s3.*.amazonaws.com"),
        ];
        for (field, pattern) in conditions {
            let p = policy(&format!(
                "default = \"deny\"\n[[rule]]\nname = \"r\"\neffect = \"allow\"\n{field} = [\"{pattern}\"]\n"
            ));
            assert_eq!(p.decide(wrong, &all_wrong).effect, Effect::Deny, "{field}");
            // Only this field carries a matching value: the rule applies.
            let mut only = all_wrong.clone();
            let mut key = wrong;
            match field {
                "principals" => {
                    only.aws_principal_arn = Some("arn:aws:iam::111122223333:role/app".into())
                }
                "operations" => only.kms_operation = "Decrypt".into(),
                "keys" => key = "k1",
                "source_vpcs" => only.aws_source_vpc = Some("vpc-0abc".into()),
                "source_vpces" => only.aws_source_vpce = Some("vpce-0def".into()),
                "kms_key_arns" => {
                    only.kms_key_arn = Some("arn:aws:kms:us-east-1:111122223333:key/k1".into())
                }
                _ => only.kms_via_service = Some("s3.us-east-1.amazonaws.com".into()),
            }
            assert_eq!(p.decide(key, &only).effect, Effect::Allow, "{field}");
        }
        // A request without the field does not match a condition on it.
        let p = policy(
            "default = \"deny\"\n[[rule]]\nname = \"r\"\neffect = \"allow\"\nvia_services = [\"*\"]\n",
        );
        let mut direct = all_wrong.clone();
        direct.kms_via_service = None;
        assert_eq!(p.decide("k1", &direct).effect, Effect::Deny);
    }

    #[test]
    fn bad_policies_are_refused_with_the_field() {
        let config: PolicyConfig = toml::from_str(
            "default = \"allow\"\n[[rule]]\nname = \"a\"\neffect = \"deny\"\nkeys = []\n",
        )
        .unwrap();
        assert!(
            Policy::compile(&config)
                .unwrap_err()
                .starts_with("rule[0].keys")
        );
        let config: PolicyConfig = toml::from_str(
            "default = \"allow\"\n[[rule]]\nname = \"a\"\neffect = \"deny\"\n[[rule]]\nname = \"a\"\neffect = \"allow\"\n",
        )
        .unwrap();
        assert!(Policy::compile(&config).unwrap_err().contains("used twice"));
        assert!(toml::from_str::<PolicyConfig>("default = \"maybe\"").is_err());
    }
}
