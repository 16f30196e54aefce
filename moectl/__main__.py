from moectl.entry import main

main()
