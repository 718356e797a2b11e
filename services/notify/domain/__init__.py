"""Pure delivery rules: retry policy, failure classification, coercion and pickup links."""
