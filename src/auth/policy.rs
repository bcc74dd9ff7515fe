//! Secondary authorization (spec §2.2): an optional per-key-store policy over the request's
//! metadata, applied after SigV4 to GetKeyMetadata, Encrypt and Decrypt, never to GetHealthStatus.
//!
//! A policy is an ordered list of rules and a default effect. A rule matches when every condition it
//! sets matches; conditions are lists of glob patterns (`*` any run of characters, `?` one
//! character) over `awsPrincipalArn`, `kmsOperation`, the key id, `awsSourceVpc`, `awsSourceVpce`,
//! `kmsKeyArn` and `kmsViaService`. The first matching rule decides; with none, the default does.
//! A denial names the rule (or the default) so that the log says which statement to fix.
//!
//! **Absent fields.** KMS leaves some fields out: the VPC fields come only for calls through a VPC
//! endpoint by the key's owner (spec v1.0.3), `kmsViaService` only for calls through an AWS
//! service. What a condition on a field the request lacks does is the rule's `when_absent`:
//! `"match"` or `"no_match"`. The default follows the rule's effect so that a missing field never
//! lets a request through: a `deny` rule's condition matches (the request is denied), an `allow`
//! rule's does not.
//!
//! **STS principals.** A caller using a role is reported as its session,
//! `arn:aws:sts::ACCOUNT:assumed-role/ROLE/SESSION` (no role path). So that a rule naming a role
//! covers its sessions, a principal pattern `arn:P:iam::A:role/[PATH/]NAME` also matches
//! `arn:P:sts::A:assumed-role/NAME/*`, and `arn:P:iam::A:*` also matches
//! `arn:P:sts::A:assumed-role/*`. A role pattern with a path and a wildcard in the name cannot be
//! carried over (the session ARN has no path to check) and is refused.
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

use crate::field::FieldError;

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    Allow,
    Deny,
}

/// What a condition on a field the request does not carry does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenAbsent {
    /// The condition holds: the rule can apply.
    Match,
    /// The condition fails: the rule does not apply.
    NoMatch,
}

impl WhenAbsent {
    /// The default for a rule of this effect: absence never lets a request through.
    pub fn default_for(effect: Effect) -> Self {
        match effect {
            Effect::Deny => WhenAbsent::Match,
            Effect::Allow => WhenAbsent::NoMatch,
        }
    }
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
    /// What conditions on fields the request lacks do; by default, what keeps a request out.
    pub when_absent: Option<WhenAbsent>,
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
    when_absent: WhenAbsent,
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

/// What a policy looks at in one request: the spec's request metadata, borrowed, with the fields
/// KMS did not send as `None`. The API fills it in; the policy knows nothing of the protocol.
#[derive(Debug, Clone, Copy)]
pub struct PolicyRequest<'a> {
    pub kms_operation: &'a str,
    pub aws_principal_arn: Option<&'a str>,
    pub kms_key_arn: Option<&'a str>,
    pub kms_via_service: Option<&'a str>,
    pub aws_source_vpc: Option<&'a str>,
    pub aws_source_vpce: Option<&'a str>,
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
    pub fn compile(config: &PolicyConfig) -> Result<Self, FieldError> {
        let mut rules = Vec::with_capacity(config.rule.len());
        for (i, rule) in config.rule.iter().enumerate() {
            if rule.name.trim().is_empty() {
                return Err(FieldError::new(
                    format!("rule[{i}].name"),
                    "must not be empty",
                ));
            }
            if config.rule[..i].iter().any(|r| r.name == rule.name) {
                return Err(FieldError::new(
                    format!("rule[{i}].name"),
                    format!("{:?} is used twice", rule.name),
                ));
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
                        return Err(FieldError::new(
                            format!("rule[{i}].{name}"),
                            "an empty list matches nothing; remove it to match anything",
                        ));
                    }
                    let mut compiled = Vec::with_capacity(patterns.len());
                    for pattern in patterns {
                        compiled.push(WildMatch::new(pattern));
                        if matches!(field, Field::Principal) {
                            let session = sts_session_pattern(pattern).map_err(|problem| {
                                FieldError::new(format!("rule[{i}].{name}"), problem)
                            })?;
                            compiled.extend(session.as_deref().map(WildMatch::new));
                        }
                    }
                    conditions.push((field, compiled));
                }
            }
            rules.push(Rule {
                name: rule.name.clone(),
                effect: rule.effect,
                when_absent: rule
                    .when_absent
                    .unwrap_or(WhenAbsent::default_for(rule.effect)),
                conditions,
            });
        }
        Ok(Self {
            default: config.default,
            rules,
        })
    }

    /// The decision for one request.
    pub fn decide(&self, key_id: &str, metadata: &PolicyRequest) -> Decision {
        let value = |field: Field| -> Option<&str> {
            match field {
                Field::Principal => metadata.aws_principal_arn,
                Field::Operation => Some(metadata.kms_operation),
                Field::Key => Some(key_id),
                Field::SourceVpc => metadata.aws_source_vpc,
                Field::SourceVpce => metadata.aws_source_vpce,
                Field::KmsKeyArn => metadata.kms_key_arn,
                Field::ViaService => metadata.kms_via_service,
            }
        };
        let matching = self.rules.iter().find(|rule| {
            rule.conditions
                .iter()
                .all(|(field, patterns)| match value(*field) {
                    Some(v) => patterns.iter().any(|p| p.matches(v)),
                    None => rule.when_absent == WhenAbsent::Match,
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

/// The STS session pattern a principal pattern for an IAM role (or a whole account) also covers:
/// `arn:P:iam::A:role/[PATH/]NAME` gives `arn:P:sts::A:assumed-role/NAME/*` (role names are unique
/// in an account, and a session ARN carries the name without the path); `arn:P:iam::A:*` gives
/// `arn:P:sts::A:assumed-role/*`. Other patterns give none. A role pattern whose path is followed
/// by a wildcard name is refused: its sessions cannot be told apart by path.
fn sts_session_pattern(pattern: &str) -> Result<Option<String>, String> {
    let mut parts = pattern.splitn(6, ':');
    let (Some("arn"), Some(partition), Some("iam"), Some(""), Some(account), Some(resource)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Ok(None);
    };
    let prefix = format!("arn:{partition}:sts::{account}:assumed-role/");
    if resource == "*" {
        return Ok(Some(format!("{prefix}*")));
    }
    let Some(role) = resource.strip_prefix("role/") else {
        return Ok(None);
    };
    let (path, name) = role.rsplit_once('/').unwrap_or(("", role));
    if name.is_empty() {
        return Ok(None);
    }
    if !path.is_empty() && name.contains(['*', '?']) {
        return Err(format!(
            "{pattern:?}: a role path with a wildcard name cannot match STS sessions \
             (arn:...:sts::ACCOUNT:assumed-role/NAME/SESSION carries no path): name the role, \
             drop the path, or add an assumed-role pattern of your own"
        ));
    }
    Ok(Some(format!("{prefix}{name}/*")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Policy {
        Policy::compile(&toml::from_str(text).unwrap()).unwrap()
    }

    fn metadata<'a>(
        principal: &'a str,
        operation: &'a str,
        vpc: Option<&'a str>,
    ) -> PolicyRequest<'a> {
        PolicyRequest {
            kms_operation: operation,
            aws_principal_arn: Some(principal),
            kms_key_arn: Some("arn:aws:kms:us-east-1:111122223333:key/k"),
            kms_via_service: None,
            aws_source_vpc: vpc,
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
        let all_wrong = PolicyRequest {
            kms_operation: wrong,
            aws_principal_arn: Some(wrong),
            kms_key_arn: Some(wrong),
            kms_via_service: Some(wrong),
            aws_source_vpc: Some(wrong),
            aws_source_vpce: Some(wrong),
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
            let mut only = all_wrong;
            let mut key = wrong;
            match field {
                "principals" => only.aws_principal_arn = Some("arn:aws:iam::111122223333:role/app"),
                "operations" => only.kms_operation = "Decrypt",
                "keys" => key = "k1",
                "source_vpcs" => only.aws_source_vpc = Some("vpc-0abc"),
                "source_vpces" => only.aws_source_vpce = Some("vpce-0def"),
                "kms_key_arns" => {
                    only.kms_key_arn = Some("arn:aws:kms:us-east-1:111122223333:key/k1")
                }
                _ => only.kms_via_service = Some("s3.us-east-1.amazonaws.com"),
            }
            assert_eq!(p.decide(key, &only).effect, Effect::Allow, "{field}");
        }
        // A request without the field does not match a condition on it.
        let p = policy(
            "default = \"deny\"\n[[rule]]\nname = \"r\"\neffect = \"allow\"\nvia_services = [\"*\"]\n",
        );
        let mut direct = all_wrong;
        direct.kms_via_service = None;
        assert_eq!(p.decide("k1", &direct).effect, Effect::Deny);
    }

    /// A deny rule on source_vpces, against requests with and without the VPC fields (KMS sends
    /// them only for the key's owner).
    #[test]
    fn deny_rules_on_absent_fields_match_unless_told_otherwise() {
        let rule = |extra: &str| {
            policy(&format!(
                "default = \"allow\"\n[[rule]]\nname = \"not-through-shared-vpce\"\neffect = \"deny\"\nsource_vpces = [\"vpce-0shared\"]\n{extra}"
            ))
        };
        let with_vpce = |vpce: Option<&'static str>| {
            let mut m = metadata("arn:aws:iam::444455556666:user/partner", "Decrypt", None);
            m.aws_source_vpc = vpce.map(|_| "vpc-0abc");
            m.aws_source_vpce = vpce;
            m
        };
        for (extra, absent) in [
            ("", Effect::Deny),
            ("when_absent = \"match\"", Effect::Deny),
            ("when_absent = \"no_match\"", Effect::Allow),
        ] {
            let p = rule(extra);
            let d = p.decide("k", &with_vpce(Some("vpce-0shared")));
            assert_eq!(
                (d.effect, d.statement.as_str()),
                (Effect::Deny, "not-through-shared-vpce"),
                "{extra}"
            );
            assert_eq!(
                p.decide("k", &with_vpce(Some("vpce-0other"))).effect,
                Effect::Allow,
                "{extra}"
            );
            assert_eq!(p.decide("k", &with_vpce(None)).effect, absent, "{extra}");
        }
        // An allow rule's condition on an absent field does not match unless told to.
        let allow = |extra: &str| {
            policy(&format!(
                "default = \"deny\"\n[[rule]]\nname = \"through-vpce\"\neffect = \"allow\"\nsource_vpces = [\"vpce-0mine\"]\n{extra}"
            ))
        };
        assert_eq!(allow("").decide("k", &with_vpce(None)).effect, Effect::Deny);
        let opened = allow("when_absent = \"match\"");
        assert_eq!(opened.decide("k", &with_vpce(None)).effect, Effect::Allow);
        assert_eq!(
            opened.decide("k", &with_vpce(Some("vpce-0other"))).effect,
            Effect::Deny
        );
        assert!(toml::from_str::<PolicyConfig>(
            "default = \"deny\"\n[[rule]]\nname = \"r\"\neffect = \"deny\"\nwhen_absent = \"maybe\"\n"
        )
        .is_err());
    }

    #[test]
    fn role_patterns_cover_the_roles_sts_sessions() {
        let p = policy(
            r#"
default = "deny"
[[rule]]
name = "no-breakglass"
effect = "deny"
principals = ["arn:aws:iam::111122223333:role/ops/breakglass"]
[[rule]]
name = "app-role"
effect = "allow"
principals = ["arn:aws:iam::111122223333:role/app-*"]
[[rule]]
name = "partner-account"
effect = "allow"
principals = ["arn:aws:iam::444455556666:*"]
"#,
        );
        let decide = |principal: &str| {
            let d = p.decide("k", &metadata(principal, "Encrypt", None));
            (d.effect, d.statement)
        };
        let allowed = |statement: &str| (Effect::Allow, statement.to_string());
        assert_eq!(
            decide("arn:aws:iam::111122223333:role/app-web"),
            allowed("app-role")
        );
        assert_eq!(
            decide("arn:aws:sts::111122223333:assumed-role/app-web/i-0123456789"),
            allowed("app-role")
        );
        // The deny on a role with a path covers its sessions, which carry no path.
        assert_eq!(
            decide("arn:aws:sts::111122223333:assumed-role/breakglass/alice"),
            (Effect::Deny, "no-breakglass".to_string())
        );
        assert_eq!(
            decide("arn:aws:sts::444455556666:assumed-role/Admin/bob"),
            allowed("partner-account")
        );
        // Another account's sessions, and other STS principals, are not covered.
        assert_eq!(
            decide("arn:aws:sts::999999999999:assumed-role/app-web/x").1,
            "default"
        );
        assert_eq!(
            decide("arn:aws:sts::111122223333:federated-user/app-web").1,
            "default"
        );
        assert_eq!(
            decide("arn:aws:sts::111122223333:assumed-role/other/app-web").1,
            "default"
        );

        let config: PolicyConfig = toml::from_str(
            "default = \"deny\"\n[[rule]]\nname = \"a\"\neffect = \"allow\"\nprincipals = [\"arn:aws:iam::111122223333:role/team/*\"]\n",
        )
        .unwrap();
        let err = Policy::compile(&config).unwrap_err().to_string();
        assert!(err.starts_with("rule[0].principals: "), "{err}");
        assert!(err.contains("assumed-role"), "{err}");
    }

    #[test]
    fn session_patterns() {
        for (pattern, session) in [
            (
                "arn:aws:iam::111122223333:role/app",
                Some("arn:aws:sts::111122223333:assumed-role/app/*"),
            ),
            (
                "arn:aws-us-gov:iam::*:role/service/app",
                Some("arn:aws-us-gov:sts::*:assumed-role/app/*"),
            ),
            (
                "arn:aws:iam::111122223333:*",
                Some("arn:aws:sts::111122223333:assumed-role/*"),
            ),
            ("arn:aws:iam::111122223333:user/bob", None),
            ("arn:aws:sts::111122223333:assumed-role/app/*", None),
            ("arn:aws:iam::111122223333:role/", None),
            ("ec2.amazonaws.com", None),
        ] {
            assert_eq!(
                sts_session_pattern(pattern).unwrap().as_deref(),
                session,
                "{pattern}"
            );
        }
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
                .to_string()
                .starts_with("rule[0].keys")
        );
        let config: PolicyConfig = toml::from_str(
            "default = \"allow\"\n[[rule]]\nname = \"a\"\neffect = \"deny\"\n[[rule]]\nname = \"a\"\neffect = \"allow\"\n",
        )
        .unwrap();
        assert!(
            Policy::compile(&config)
                .unwrap_err()
                .problem()
                .contains("used twice")
        );
        assert!(toml::from_str::<PolicyConfig>("default = \"maybe\"").is_err());
    }
}
