from dldna_fused.cli import main

raise SystemExit(main())
