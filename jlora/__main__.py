import sys

from jlora._cli import main

sys.exit(main())
