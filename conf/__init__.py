"""The YAML defaults every entry point reads (flags override them), packaged beside `jobs` and
`serve` so an installed copy finds them where a source tree keeps them."""
